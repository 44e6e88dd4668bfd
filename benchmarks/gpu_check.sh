#!/usr/bin/env bash
# The one device check of a session lent a GPU machine (device tool): CUDA tests, bench_gpu.py, bench_nms.py,
# then profile_gpu.py (stage times, cuDNN autotuning on/off, host syncs by source line, top kernels). ~4-6 min.
# Runs with the machine's own python3/torch; wheels the project needs beyond it travel in .whl/
# (pycocotools, faster-coco-eval, ensemble-boxes, and numba + llvmlite for fusion's compiled loops, which
# the machine may lack). Writes logs under $OUT when set.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))"
python3 -c "import numba, numpy; print('numba', numba.__version__, 'numpy', numpy.__version__)" || echo "numba not importable: fusion runs its Python loops"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_cuda_paths.py tests/models/test_mask_paste.py tests/models/test_pooler.py \
  tests/models/test_predictor.py tests/models/test_detection_nms.py tests/test_device.py -k "not docks" 2>&1 | tee "$OUT/gpu_tests.txt"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.txt"
timeout ${NMS_TIMEOUT:-60} python3 benchmarks/bench_nms.py 2>&1 | tee "$OUT/bench_nms.txt"
timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/profile_gpu.py 2>&1 | tee "$OUT/profile_gpu.txt"
