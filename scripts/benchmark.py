"""Dense vs FDConv benchmark (same as `fdconv-zoo bench`): python scripts/benchmark.py --help"""
import sys

from fdconv_zoo.apps.cli import main

if __name__ == '__main__':
    sys.exit(main(['bench', *sys.argv[1:]]))
