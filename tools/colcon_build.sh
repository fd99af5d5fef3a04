#!/usr/bin/env bash
# The ROS user's build path: `colcon build` of this package against the ROS 2
# prefix in a virtual environment (made by `make venv`), in a workspace laid out
# as a ROS user has it (OUTDIR/src/x2p_ros), so that no build input lies inside
# the package's source folder (the .venv of a checkout does).
# Usage: tools/colcon_build.sh VENV OUTDIR [--test]   -> OUTDIR/{src,build,install,log}
# With --test the build includes the tests and `colcon test` runs them (PYTEST_ADDOPTS selects).
set -euo pipefail
testing=OFF
[ "${3:-}" = "--test" ] && testing=ON
venv=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
rm -rf "$out/src" && mkdir -p "$out/src/x2p_ros"
for f in package.xml CMakeLists.txt setup.py ruff.toml msg x2p_ros launch config scripts test; do
  [ -e "$here/$f" ] && cp -r "$here/$f" "$out/src/x2p_ros/"
done
cd "$out"
colcon --log-base "$out/log" build --base-paths src --build-base "$out/build" --install-base "$out/install" \
  --cmake-args -DPython3_EXECUTABLE="$venv/bin/python" -DBUILD_TESTING=$testing -Wno-dev
if [ "$testing" = ON ]; then
  colcon --log-base "$out/log" test --base-paths src --build-base "$out/build" --install-base "$out/install" \
    --event-handlers console_direct+
  colcon test-result --test-result-base "$out/build" --verbose
fi
