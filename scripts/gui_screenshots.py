"""Drive the real CellProfiler 4.2.8 GUI with the CP2Image plugin and save screenshots (docs/gui/ by default).

Run through scripts/gui_screenshots.sh, which starts a virtual screen (Xvfb) and a throwaway HOME so your own
CellProfiler preferences are untouched. In one GUI process it:

1. opens "Add module", selects the Object Processing category and CP2Image in it   -> 1-add-module.png
2. selects CP2Image in the demo pipeline: its settings panel                       -> 2-settings.png
3. runs one image set (ExampleFly 01_POS002) in test mode up to CP2Image, whose
   display window shows real vs synthesized cells                                  -> 3-display.png
4. removes MeasureTexture from the pipeline: CP2Image is flagged in the module list
   (its message is the flag's tooltip)                                             -> 4-validation-error.png

and writes what it saw to gui-check.json (read by tests/test_gui.py). Exit status 0 only if every step worked.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELD = "01_POS002"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "gui"), help="folder for the PNGs and gui-check.json")
    p.add_argument("--pipeline", default=str(ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe"))
    p.add_argument("--step-ms", type=int, default=1500, help="pause between GUI steps (lets the GUI redraw)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cp2image-gui-"))
    images = work / "images"  # a visible folder: CellProfiler skips files under hidden ones such as .venv
    images.mkdir()
    import cellprofiler

    src = Path(cellprofiler.__file__).parent / "data" / "examples" / "ExampleFly" / "images"
    for ch in "DFR":
        shutil.copy(src / f"{FIELD}_{ch}.TIF", images)

    import matplotlib

    matplotlib.use("WXAgg")
    import cellprofiler_core.preferences as prefs

    # answered before the GUI exists, so no first-start dialog blocks the script
    prefs.set_telemetry(False)
    prefs.set_telemetry_prompt(False)
    prefs.set_startup_blurb(False)
    prefs.set_check_update(False)
    prefs.set_show_exiting_test_mode_dlg(False)
    prefs.set_plugin_directory(str(ROOT / "plugins"), globally=False)
    prefs.set_default_image_directory(str(images))
    (work / "output").mkdir()
    prefs.set_default_output_directory(str(work / "output"))

    import wx
    from cellprofiler.gui.app import App
    from cellprofiler.gui.figure import Figure
    from PIL import ImageGrab

    check: dict = {"steps": {}, "errors": []}

    def grab(window, name: str) -> None:
        window.Raise()
        window.Update()
        wx.SafeYield()
        x, y, w, h = window.GetScreenRect()
        ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=os.environ["DISPLAY"]).save(out / name)
        check["steps"].setdefault(name, {})["size"] = [w, h]

    class ScreenshotApp(App):
        def OnInit(self):
            ok = super().OnInit()
            self.frame.SetSize((1500, 950))
            self.frame.SetPosition((0, 0))
            steps = [self.add_module_window, self.settings_panel, self.run_one_image_set, self.validation_error,
                     self.hover_error, self.grab_validation]
            self.steps = iter(steps)
            wx.CallLater(4 * args.step_ms, self.next_step)
            return ok

        def next_step(self):
            step = next(self.steps, None)
            if step is None:
                (out / "gui-check.json").write_text(json.dumps(check, indent=1))
                wx.CallAfter(self.ExitMainLoop)
                return
            try:
                step()
            except Exception:
                check["errors"].append(f"{step.__name__}: {traceback.format_exc()}")
                traceback.print_exc()
            wx.CallLater(args.step_ms, self.next_step)

        # -- helpers
        @property
        def controller(self):
            return self.frame.pipeline_controller

        @property
        def pipeline(self):
            return self.frame.pipeline

        def cp2image(self):
            return next(m for m in self.pipeline.modules() if m.module_name == "CP2Image")

        # -- steps
        def add_module_window(self):
            self.controller.open_add_modules()
            frame = next(w for w in wx.GetTopLevelWindows() if type(w).__name__ == "AddModuleFrame")
            categories = frame._AddModuleFrame__module_categories_list_box
            modules = frame._AddModuleFrame__module_list_box
            i = categories.GetItems().index("Object Processing")
            categories.SetSelection(i)
            frame._AddModuleFrame__on_category_selected(None)
            names = modules.GetItems()
            modules.SetSelection(names.index("CP2Image"))
            frame.SetPosition((0, 0))
            wx.SafeYield()
            grab(frame, "1-add-module.png")
            check["steps"]["1-add-module.png"]["object_processing_modules"] = names
            self._add_frame = frame

        def settings_panel(self):
            self._add_frame.Hide()
            module = self.cp2image()
            self.frame.pipeline_list_view.select_one_module(module.module_num)
            wx.SafeYield()
            view = self.frame.module_view
            labels = [c.GetLabel() for c in _descendants(view.module_panel) if isinstance(c, wx.StaticText)]
            check["steps"].setdefault("2-settings.png", {})["labels"] = labels
            grab(self.frame, "2-settings.png")

        def run_one_image_set(self):
            self.pipeline.add_urls([Path(p).as_uri() for p in sorted(images.iterdir())])
            wx.SafeYield()
            for m in self.pipeline.modules():
                m.show_window = m.module_name == "CP2Image"
            if not self.controller.start_debugging():
                raise RuntimeError("test mode did not start (no image set?)")
            ran = []
            while True:
                module = self.controller.current_debug_module()
                if module is None or not self.controller.do_step(module):
                    raise RuntimeError(f"test mode stopped at {module and module.module_name}")
                ran.append(module.module_name)
                if module.module_name == "CP2Image":
                    break
                self.controller.next_debug_module()
            wx.SafeYield()
            figures = [w for w in wx.GetTopLevelWindows() if isinstance(w, Figure) and w.IsShown()]
            if not figures:
                raise RuntimeError("CP2Image showed no display window")
            fig = figures[-1]
            fig.SetSize((1200, 520))
            fig.SetPosition((100, 100))
            fig.figure.canvas.draw()
            wx.SafeYield()
            grab(fig, "3-display.png")
            check["steps"]["3-display.png"].update(
                ran=ran, title=fig.GetTitle(), axes=len(fig.figure.axes),
                titles=[a.get_title() for a in fig.figure.axes])
            fig.Close()
            self.controller.stop_debugging()

        def validation_error(self):
            for m in [m for m in self.pipeline.modules() if m.module_name == "MeasureTexture"]:
                self.pipeline.remove_module(m.module_num)
            module = self.cp2image()
            self.frame.pipeline_list_view.select_one_module(module.module_num)
            wx.SafeYield()

        def hover_error(self):
            """Point at the setting the error names: the GUI shows the message as its tooltip."""
            from cellprofiler.gui.utilities.module_view import edit_control_name

            module = self.cp2image()
            ctrl = self.frame.module_view.module_panel.FindWindowByName(edit_control_name(module.objects_name))
            x, y, w, h = ctrl.GetScreenRect()
            wx.UIActionSimulator().MouseMove(x + w // 2, y + h // 2)

        def grab_validation(self):
            from cellprofiler.gui.pipelinelistview import PLV_STATE_ERROR

            module = self.cp2image()
            list_ctrl, index = self.frame.pipeline_list_view.get_ctrl_and_index(module)
            item = list_ctrl.items[index]
            grab(self.frame, "4-validation-error.png")
            check["steps"]["4-validation-error.png"].update(
                list_tooltip=item.tooltip,
                list_error_state=bool(item._PipelineListCtrlItem__state & PLV_STATE_ERROR))

    app = ScreenshotApp(False, pipeline_path=args.pipeline)
    app.MainLoop()
    shutil.rmtree(work, ignore_errors=True)
    ok = not check["errors"] and len(check["steps"]) == 4
    print(json.dumps(check, indent=1)[:4000])
    return 0 if ok else 1


def _descendants(window):
    for child in window.GetChildren():
        yield child
        yield from _descendants(child)


if __name__ == "__main__":
    sys.exit(main())
