# Sourced by the device scripts (run from the repository root): `simrec` importable without an
# install, since the device's python has torch but no package registry; $PY and $OUT set.
: "${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
mkdir -p /tmp/simrec_path
ln -sfn "$PWD/simulator" /tmp/simrec_path/simrec      # `simrec.operators` without an install
export PYTHONPATH="/tmp/simrec_path:$PWD" PYTHONUNBUFFERED=1
