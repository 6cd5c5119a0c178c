"""One small trainer per stage, each a config dataclass plus a function that runs it:

    from minirlhf.train.pretrain import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(max_steps=200))

The command line (`minirlhf <stage>`) is a thin layer over these.
"""
