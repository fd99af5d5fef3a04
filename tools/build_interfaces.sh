#!/usr/bin/env bash
# Builds msg/ with the ROS 2 Jazzy wheels of a virtual environment and installs
# the generated x2p_ros.msg modules into it.
# Usage: tools/build_interfaces.sh VENV   (the venv imports x2p_ros from this checkout)
set -euo pipefail
venv=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"

# The wheels' CMake export files name the include folders of the container they
# were built in; point them at this interpreter's and this numpy's.
py_inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_inc=$("$py" -c 'import numpy; print(numpy.get_include())')
{ grep -rl --include="*.cmake" "/opt/python/cp311-cp311" "$venv/share" || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
         -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" "$f"
done

export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
build="$here/build/interfaces"
mkdir -p "$here/build"
cmake -S "$here" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" -DBUILD_TESTING=OFF -DX2P_INSTALL_PYTHON_SOURCES=OFF \
  -DPython3_EXECUTABLE="$py" -DCMAKE_BUILD_TYPE=Release -Wno-dev >"$build.log" 2>&1 \
  || { cat "$build.log"; exit 1; }
cmake --build "$build" -j 2 >>"$build.log" 2>&1 || { tail -n 60 "$build.log"; exit 1; }
cmake --install "$build" >>"$build.log" 2>&1 || { tail -n 30 "$build.log"; exit 1; }
echo "interfaces installed into $venv (log: $build.log)"
