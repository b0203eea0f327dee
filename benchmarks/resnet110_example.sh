#!/usr/bin/env bash
# Builds the real-scores ResNet-110 input of benchmarks/solver_scale.py --resnet110 DIR: a CIFAR-style ResNet-110
# (3 stages x 18 basic blocks, widths 8/16/32) trained on Fashion-MNIST, a trained exit head after the stem and
# after each of the first 53 residual blocks (54 exits; the 54th block feeds the final classifier), calibrated
# with 8 threshold levels on 5,000 samples, and an estimated profile on pi4, jetson-orin-nano and x86-server.
# The heads are fit on 5,000 of the 10,000 test images and thresholds measured on the other 5,000 (calib.npz
# holds 5,000 in all; the model never trained on test images). The training record goes to DIR/models.json (the
# twenty-third session's: benchmarks/results/resnet110_model.json).
#     benchmarks/resnet110_example.sh DIR   (needs examples/fashion_mnist/test.npz: make_data.py; ~15 min on 2 cores)
# Its chain, calibration and profile are committed, gzip-compressed, in benchmarks/data/resnet110-trained/ (what
# the benchmarks read by default, with models.json): PyTorch's kernels differ from one CPU to another, and so does
# what this builds (twenty-ninth session, an Intel Xeon: test accuracy 91.14% where an AMD EPYC gave 91.11%, and the
# best plan known 1.872 ms where the EPYC's instance had 1.702). To replace them:
#     for f in chain calibration profile; do gzip -9n -c DIR/$f.json > benchmarks/data/resnet110-trained/$f.json.gz; done
set -euo pipefail
dir=${1:?usage: benchmarks/resnet110_example.sh DIR}
M=examples/fashion_mnist
D=.venv/bin/distree
mkdir -p "$dir"
[ -f "$dir/resnet_plain.onnx" ] || .venv/bin/python $M/train.py --model plain --blocks-per-stage 18 --epochs 8 \
    --out-dir "$dir"
at=$(seq -s, 1 2 107)      # the stem's ReLU and each residual block's: blocks 1, 3, ..., 107 of 113
$D exits "$dir/resnet_plain.onnx" --data $M/test.npz --at "$at" -o "$dir/model_exits.onnx"
$D inspect "$dir/model_exits.onnx" --json "$dir/chain.json"
$D calibrate "$dir/model_exits.onnx" --data $M/test.npz -o "$dir/calibration.json"
$D profile "$dir/model_exits.onnx" --device pi4 --device jetson-orin-nano --device x86-server --estimate \
    -o "$dir/profile.json"
