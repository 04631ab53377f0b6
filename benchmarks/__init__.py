"""Benchmarks of tsgb-fx: speed, memory and peers, each as ratios measured side by side in one run.

Run from the repository root (``make bench`` runs everything and rewrites benchmarks/README.md):

    python -m benchmarks.speed  --models resnet50 --batch-sizes 1 8   # eager / explicit / ORT [--peers]
    python -m benchmarks.peers  --models resnet50 --batch-sizes 1 8   # Captum, Zennit, Grad-CAM
    python -m benchmarks.memory --models resnet50 --batch-sizes 1 8   # peak memory, fresh process per case
    python -m benchmarks.plot                                         # scaling.png (batch, image size)
    python -m benchmarks.report                                       # README.md from results/*.json
    benchmarks/gpu.sh                                                 # the same on a CUDA machine, < 5 min

``benchmarks.quality`` (map quality on a pretrained model) writes its own section of README.md,
between markers that report.py keeps.

Every script prints a markdown table; ``--json-out`` keeps the raw numbers (what report.py reads)
and ``--markdown-out`` the table. Models are torchvision names with random weights.
"""
