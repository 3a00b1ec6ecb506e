"""Semantic segmentation: accelerate launch scripts/segment.py --model convnext_tiny_fdconv.fb_in22k_ft_in1k ..."""
import sys

from fdconv_zoo.apps.segment import main

if __name__ == '__main__':
    sys.exit(main())
