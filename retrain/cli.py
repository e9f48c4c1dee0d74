"""The `retrain` command line: `retrain backbones`, `retrain predict` and `retrain promote`.

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
    predict.add_argument(
        "--model",
        default="model",
        help="an exported model folder (its model.tflite is used when there is one, else its "
        "SavedModel), a .tflite file or a SavedModel folder (default: model)",
    )
    predict.add_argument("--top_k", type=int, default=None, help="print only the K most probable labels")
    predict.add_argument(
        "--min_confidence",
        type=float,
        default=None,
        metavar="P",
        help="answer 'unsure' when the top probability is below P (0 to 1)",
    )
    predict.add_argument("--category_names", default=None, help="JSON object: label or 1-based index → display name")
    predict.add_argument("--show", action="store_true", help="draw each image with its prediction")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    promote = commands.add_parser(
        "promote", help="register an experiment's logged model in the MLflow registry with an alias"
    )
    promote.add_argument("experiment", help="a DVC experiment name (dvc exp show), an MLflow run id, or `workspace`")
    promote.add_argument(
        "--alias", default="champion", help="registry alias to point at the new version (default: champion)"
    )
    promote.add_argument(
        "--name", default=None, help="registered model name (default: params.yaml tracking.registered_model)"
    )
    return parser


def _promote(args) -> int:
    from mlflow.exceptions import MlflowException

    from retrain import tracking
    from retrain.params import load_params

    params = load_params()
    name = args.name or params.tracking.registered_model
    try:
        run_name, version = tracking.promote(args.experiment, args.alias, name, params.tracking.experiment)
    except MlflowException as error:  # a refused name or alias, a store that is down: one line
        raise tracking.store_error(error) from None
    print(
        f"registered {name} version {version} from run {run_name} as @{args.alias}; serve it with:\n"
        f"  mlflow models serve -m models:/{name}@{args.alias} --env-manager local -p 5001"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> int:
        if args.command == "backbones":
            from retrain.backbones import print_presets

            print_presets()
            return 0
        if args.command == "promote":
            return _promote(args)
        from retrain.predict import run

        return run(args)

    return exit_on_error(command)


if __name__ == "__main__":
    sys.exit(main())
