"""The command line: ``minirlhf <stage> [options]`` (also ``python -m minirlhf``).

Each stage's options are the fields of its config dataclass in `minirlhf.train`, so the command
line, the Python API and the printed run settings always agree:

    minirlhf pretrain --max-steps 2000            ==  pretrain(PretrainConfig(max_steps=2000))
"""

import argparse
import dataclasses
import importlib
import sys
import types

# stage name -> (its module in minirlhf.train, the config class and the run function in it, help).
# Names, not objects: `minirlhf --help` imports no trainer, and a stage's module is imported only
# when that stage runs or shows its own help. Adding a stage is adding a line here.
STAGES = {
    "pretrain": ("pretrain", "PretrainConfig", "pretrain",
                 "step 0: next-token pretraining of a GPT on a text corpus (default: Shakespeare)"),
    "sample": ("sample", "SampleConfig", "sample", "generate text from a checkpoint"),
    "sft": ("sft", "SFTConfig", "sft", "step 1: supervised fine-tuning on prompt/completion JSONL"),
    "reward": ("reward", "RewardConfig", "reward",
               "step 2: a Bradley-Terry reward model on prompt/chosen/rejected JSONL"),
    "rl": ("rl", "RLConfig", "rl", "step 3: REINFORCE with a KL penalty against a frozen reference"),
    "ppo": ("ppo", "PPOConfig", "ppo",
            "step 3 as InstructGPT ran it: PPO with a value model, GAE and a per-token KL penalty"),
    "grpo": ("grpo", "GRPOConfig", "grpo",
             "step 3 as GRPO: group-relative advantages, no value model (and Dr. GRPO, DAPO)"),
    "bon": ("bon", "BonConfig", "bon",
            "best-of-n: keep the best of n samples by the reward model; reward, gold and KL per n"),
    "dpo": ("dpo", "DPOConfig", "dpo", "DPO on prompt/chosen/rejected JSONL (replaces steps 2 and 3)"),
    "kto": ("kto", "KTOConfig", "kto", "KTO on thumbs-up/thumbs-down JSONL (prompt/completion/label), or pairs"),
    "cpo": ("cpo", "CPOConfig", "cpo", "CPO on prompt/chosen/rejected JSONL: no reference model, plus SFT"),
    "simpo": ("cpo", "SimPOConfig", "simpo", "SimPO: length-normalised preference pairs, no reference model"),
    "orpo": ("orpo", "ORPOConfig", "orpo", "ORPO: SFT and an odds-ratio preference term in one loss"),
    "demo": ("demo", "DemoConfig", "demo",
             "the whole pipeline on Shakespeare: pretrain, SFT, reward model, RL and DPO, report"),
    "export": ("export", "ExportConfig", "export", "write a checkpoint as a Hugging Face GPT-2 folder"),
    "import": ("export", "ImportConfig", "import_hf", "read a Hugging Face GPT-2 folder into a .npz"),
}


def _stage(name):
    """(config class, run function, one-line help) of a stage, its module imported now."""
    module_name, config_name, run_name, help_text = STAGES[name]
    module = importlib.import_module(f"minirlhf.train.{module_name}")
    return getattr(module, config_name), getattr(module, run_name), help_text


def _stages():
    """stage name -> (config class, run function, one-line help), every trainer imported."""
    return {name: _stage(name) for name in STAGES}


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
        if t is not bool and not f.metadata.get("required") and "default" not in help_text:
            help_text = f"{help_text} (default: {default})"   # unless the help says it in words
        if t is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif "choices" in f.metadata:
            parser.add_argument(flag, dest=f.name, type=t, default=default, choices=f.metadata["choices"],
                                help=help_text)
        elif f.metadata.get("required"):
            parser.add_argument(flag, dest=f.name, type=t, required=True, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=t, default=default, help=help_text)


def build_parser(stages=None):
    """The parser of every stage; the options of those in ``stages`` (default: all) are filled in,
    each by importing its trainer."""
    parser = argparse.ArgumentParser(
        prog="minirlhf", description="RLHF from scratch: pretrain, SFT, reward model, RL, DPO.")
    sub = parser.add_subparsers(dest="stage", metavar="stage", required=True)
    for name, (*_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if stages is None or name in stages:
            add_config_arguments(p, _stage(name)[0])
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(stages=argv[:1])      # only the stage asked for is imported
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    config_cls, run, _ = _stage(stage)
    from .backend import DeviceError
    from .checkpoint import CheckpointError
    from .datasets import DataError
    from .hf import HFError
    from .train.common import ConfigError
    from .train.folder import command_line
    from .train.rollout import RewardFunctionError
    from .train.run import DivergenceError, Interrupted
    import numpy as np
    try:
        # a run checks its loss and gradients itself and stops at the first NaN in one line: NumPy's
        # warnings about the overflows that lead there would only bury that line
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            run(config_cls(**args))
    except (ConfigError, DataError, DeviceError, CheckpointError, HFError, FileNotFoundError,
            RewardFunctionError) as e:
        # bad input: one clear line, no traceback
        print(f"minirlhf {stage}: error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"minirlhf {stage}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        done = f"{e}" if isinstance(e, Interrupted) else "the last checkpoint is intact"
        print(f"\nminirlhf {stage}: interrupted: {done}; to go on, type: {command_line(argv)}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
