"""The command line: ``minirlhf <stage> [options]`` (also ``python -m minirlhf``).

Each stage's options are the fields of its config dataclass in `minirlhf.train`, so the command
line, the Python API and the printed run settings always agree:

    minirlhf pretrain --max-steps 2000            ==  pretrain(PretrainConfig(max_steps=2000))
"""

import argparse
import dataclasses
import sys
import types

from .backend import DeviceError
from .checkpoint import CheckpointError
from .datasets import DataError
from .train.common import ConfigError
from .train.ppo import NonFiniteError
from .train.rl import RewardFunctionError


def _stages():
    """stage name -> (config class, run function, one-line help); imported lazily to start fast."""
    from .train import demo, dpo, export, ppo, pretrain, reward, rl, sample, sft
    return {
        "pretrain": (pretrain.PretrainConfig, pretrain.pretrain,
                     "step 0: next-token pretraining of a GPT on a text corpus (default: Shakespeare)"),
        "sample": (sample.SampleConfig, sample.sample, "generate text from a checkpoint"),
        "sft": (sft.SFTConfig, sft.sft, "step 1: supervised fine-tuning on prompt/completion JSONL"),
        "reward": (reward.RewardConfig, reward.reward,
                   "step 2: a Bradley-Terry reward model on prompt/chosen/rejected JSONL"),
        "rl": (rl.RLConfig, rl.rl, "step 3: REINFORCE with a KL penalty against a frozen reference"),
        "ppo": (ppo.PPOConfig, ppo.ppo, "step 3 as InstructGPT ran it: PPO with a value model, GAE and "
                                        "a per-token KL penalty"),
        "dpo": (dpo.DPOConfig, dpo.dpo, "DPO on prompt/chosen/rejected JSONL (replaces steps 2 and 3)"),
        "demo": (demo.DemoConfig, demo.demo,
                 "the whole pipeline on Shakespeare: pretrain, SFT, reward model, RL and DPO, report"),
        "export": (export.ExportConfig, export.export, "write a checkpoint as a Hugging Face GPT-2 folder"),
        "import": (export.ImportConfig, export.import_hf, "read a Hugging Face GPT-2 folder into a .npz"),
    }


def _arg_type(field):
    """The argparse type of a config field from its annotation (``str | None`` -> str)."""
    t = field.type
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return t


def add_config_arguments(parser, config_cls):
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        t = _arg_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if t is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif "choices" in f.metadata:
            parser.add_argument(flag, dest=f.name, type=t, default=default, choices=f.metadata["choices"],
                                help=f"{help_text} (default: {default})")
        elif f.metadata.get("required"):
            parser.add_argument(flag, dest=f.name, type=t, required=True, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=t, default=default,
                                help=f"{help_text} (default: {default})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minirlhf", description="RLHF from scratch: pretrain, SFT, reward model, RL, DPO.")
    sub = parser.add_subparsers(dest="stage", metavar="stage", required=True)
    for name, (config_cls, _, help_text) in _stages().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(p, config_cls)
    return parser


def main(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    config_cls, run, _ = _stages()[stage]
    try:
        run(config_cls(**args))
    except (ConfigError, DataError, DeviceError, CheckpointError, FileNotFoundError,
            RewardFunctionError, NonFiniteError) as e:
        # bad input: one clear line, no traceback
        print(f"minirlhf {stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nminirlhf {stage}: interrupted; finished checkpoints are intact, run again to go on",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
