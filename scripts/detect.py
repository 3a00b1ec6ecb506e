"""Detection: accelerate launch scripts/detect.py --model resnet50_fdconv.a1_in1k --detector faster_rcnn ..."""
import sys

from fdconv_zoo.apps.detect import main

if __name__ == '__main__':
    sys.exit(main())
