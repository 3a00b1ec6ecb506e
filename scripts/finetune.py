"""Fine-tune an FDConv model: accelerate launch scripts/finetune.py --model resnet50_fdconv.a1_in1k ..."""
import sys

from fdconv_zoo.apps.finetune import main

if __name__ == '__main__':
    sys.exit(main())
