"""The KD/CFL train step in PyTorch (torchvision ResNets), for speed comparisons.

    python scripts/torch_reference.py [--method cfl] [--batch_size 8] [--image_size 32]

See `benchmarks.torch_reference`.
"""

from benchmarks.torch_reference import main

if __name__ == "__main__":
    main()
