"""Print the README's model table: params and FLOPs (FFTs counted) of each FDConv architecture vs dense timm."""
import argparse
import json

import timm

import fdconv_zoo  # noqa: F401  registers the models
from fdconv_zoo.apps.benchmark import model_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args()
    rows = model_table(timm.list_models('*_fdconv'))
    print('| architecture | input | params dense | params FDConv | GFLOPs dense | GFLOPs FDConv (FFT part) '
          '| tags <- dense source on the Hub |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        tags = '<br>'.join(f'`{t}` <- `{src}`' for t, src in r['tags'].items())
        print(f"| {r['model']} | {r['img_size']} | {r['params_dense_m']:.2f}M | {r['params_fdconv_m']:.2f}M "
              f"| {r['gflops_dense']:.2f} | {r['gflops_fdconv']:.2f} ({r['gflops_fft']:.2f}) | {tags} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
