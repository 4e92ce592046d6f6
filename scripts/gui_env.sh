# Source this (bash) to let .venv's wxPython find its libwx_*.so (its RUNPATH points elsewhere).
_cp2image_venv=${VENV:-.venv}
_cp2image_wx=$("$_cp2image_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/wx
export LD_LIBRARY_PATH="$_cp2image_wx${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _cp2image_venv _cp2image_wx
