"""The `retrain` command line: `retrain backbones` and `retrain predict`.

The pipeline itself runs through `dvc repro`; these are the commands a user types around it.
"""

import argparse
import sys

from retrain.errors import exit_on_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backbones", help="list the backbone presets and whether each works offline here")
    predict = commands.add_parser("predict", help="classify images with an exported model")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (walked)")
    predict.add_argument("--model", default="model", help="exported model folder (default: model)")
    predict.add_argument("--top_k", type=int, default=None, help="print only the K most probable labels")
    predict.add_argument("--category_names", default=None, help="JSON object: label or 1-based index → display name")
    predict.add_argument("--show", action="store_true", help="draw each image with its prediction")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> int:
        if args.command == "backbones":
            from retrain.backbones import print_presets

            print_presets()
            return 0
        from retrain.predict import run

        return run(args)

    return exit_on_error(command)


if __name__ == "__main__":
    sys.exit(main())
