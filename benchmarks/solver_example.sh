#!/usr/bin/env bash
# Builds the real-scores input of benchmarks/solver_scale.py --example DIR: the example's plain ResNet with a
# trained exit head after every block (22), its calibration (8 levels, 2,500 threshold-split samples) and an
# estimated profile on pi4, jetson-orin-nano and x86-server (the order solver_scale.py takes 2 and 3 devices in).
#     benchmarks/solver_example.sh DIR      (needs examples/fashion_mnist/calib.npz: make_data.py)
# Its chain, calibration and profile are committed, gzip-compressed, in benchmarks/data/example-22-exits/ (what
# the benchmarks read by default): the heads' fit and the profile's fixed costs (timed on this machine) differ from
# one machine to another, and so does the instance. To replace them:
#     for f in chain calibration profile; do gzip -9n -c DIR/$f.json > benchmarks/data/example-22-exits/$f.json.gz; done
set -euo pipefail
dir=${1:?usage: benchmarks/solver_example.sh DIR}
M=examples/fashion_mnist
D=.venv/bin/distree
mkdir -p "$dir"
$D exits $M/resnet_plain.onnx --data $M/calib.npz -o "$dir/model_exits.onnx"
$D inspect "$dir/model_exits.onnx" --json "$dir/chain.json"
$D calibrate "$dir/model_exits.onnx" --data $M/calib.npz -o "$dir/calibration.json"
$D profile "$dir/model_exits.onnx" --device pi4 --device jetson-orin-nano --device x86-server --estimate \
    -o "$dir/profile.json"
