"""Checkpoints: round trips, atomic saves, clear errors for bad files, and exact resumption."""

import os
import zipfile

import numpy as np
import pytest

import minirlhf.functional as F
from minirlhf.checkpoint import (CheckpointError, load_checkpoint, load_model, rng_from_state,
                                 save_checkpoint)
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.optim import AdamW, clip_grad_norm_, lr_schedule, param_groups

CFG = GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=11)


def train_steps(model, optimizer, data_rng, steps, start):
    """A few real training steps; the batches come from ``data_rng``. Returns the losses."""
    losses = []
    for step in range(start, start + steps):
        optimizer.lr = lr_schedule(step, 1e-2, warmup_steps=2, total_steps=6, min_lr=1e-3)
        idx = data_rng.integers(0, CFG.vocab_size, (4, CFG.block_size + 1))
        loss = F.cross_entropy(model(idx[:, :-1]), idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_round_trip_restores_weights_optimizer_step_rng_and_extra(tmp_path):
    model = GPT(CFG, seed=1)
    optimizer = AdamW(param_groups(model), lr=1e-2)
    rng = np.random.default_rng(5)
    train_steps(model, optimizer, rng, 2, 0)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, CFG, optimizer=optimizer, step=2, rng_state=rng,
                    extra={"note": "hi", "losses": [1.5, 1.25], "table": np.arange(3)})

    ckpt = load_checkpoint(path)
    assert ckpt["model_class"] == "GPT" and ckpt["config"] == vars(CFG) and ckpt["step"] == 2
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(ckpt["model"][name], value)
        assert ckpt["model"][name].dtype == np.float32
    assert ckpt["extra"]["note"] == "hi" and ckpt["extra"]["losses"] == [1.5, 1.25]
    np.testing.assert_array_equal(ckpt["extra"]["table"], np.arange(3))
    assert rng_from_state(ckpt["rng_state"]).random() == rng.random()
    saved = optimizer.state_dict()
    for i, s in saved["state"].items():
        assert ckpt["optimizer"]["state"][str(i)]["step"] == s["step"]
        np.testing.assert_array_equal(ckpt["optimizer"]["state"][str(i)]["v"], s["v"])

    again = load_model(path)
    assert type(again) is GPT and again.config == CFG
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    # a plain NumPy archive, readable without pickle
    with np.load(path, allow_pickle=False) as z:
        assert "model/transformer.wte.weight" in z.files


def test_a_reward_model_round_trips_through_load_model(tmp_path):
    rm = RewardModel(CFG, seed=2)
    save_checkpoint(tmp_path / "rm.npz", rm, CFG)
    again = load_model(tmp_path / "rm.npz")
    assert type(again) is RewardModel
    np.testing.assert_array_equal(again.head.weight.data, rm.head.weight.data)


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    cfg = GPTConfig(**{**vars(CFG), "dropout": 0.1})       # dropout too: its RNG is saved as well

    model = GPT(cfg, seed=0)
    optimizer = AdamW(param_groups(model), lr=1e-2)
    straight = train_steps(model, optimizer, np.random.default_rng(42), 6, 0)

    model = GPT(cfg, seed=0)
    optimizer = AdamW(param_groups(model), lr=1e-2)
    data_rng = np.random.default_rng(42)
    first = train_steps(model, optimizer, data_rng, 3, 0)
    path = tmp_path / "step3.npz"
    save_checkpoint(path, model, cfg, optimizer=optimizer, step=3,
                    rng_state={"data": data_rng, "dropout": model.dropout_rng})
    del model, optimizer, data_rng

    fresh = GPT(cfg, seed=123)                                # other weights, overwritten by the load
    fresh_opt = AdamW(param_groups(fresh), lr=5.0)
    ckpt = load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    fresh.dropout_rng = rng_from_state(ckpt["rng_state"]["dropout"])     # reaches every Dropout
    rest = train_steps(fresh, fresh_opt, rng_from_state(ckpt["rng_state"]["data"]), 3, ckpt["step"])

    assert first + rest == straight                           # exact, float32
    assert all(p.dtype == np.float32 for p in fresh.parameters())


def test_a_crash_during_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    model = GPT(CFG, seed=1)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, CFG, step=1)
    before = open(path, "rb").read()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")               # some bytes are out...
        raise RuntimeError("power cut")                      # ...then the machine dies

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(path, GPT(CFG, seed=2), CFG, step=2)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["ckpt.npz"]
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["step"] == 1


def test_a_truncated_file_is_a_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, GPT(CFG), CFG)
    data = open(path, "rb").read()
    for keep in (len(data) // 2, len(data) - 10, 100):
        cut = tmp_path / f"cut{keep}.npz"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=rf"cut{keep}\.npz is damaged"):
            load_checkpoint(cut)


def test_other_files_are_checkpoint_errors_naming_the_file(tmp_path):
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(CheckpointError, match=r"noise\.bin is not a minirlhf checkpoint"):
        load_checkpoint(noise)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a minirlhf checkpoint"):
        load_checkpoint(empty)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(CheckpointError, match="no header"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.npz")
    # a zip member that is not a clean .npy
    zipped = tmp_path / "zipped.npz"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("__header__.npy", b"not an array")
    with pytest.raises(CheckpointError, match="zipped.npz is damaged"):
        load_checkpoint(zipped)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, GPT(CFG), CFG)
    wider = GPTConfig(**{**vars(CFG), "n_embd": 32})
    with pytest.raises(CheckpointError, match=r"ckpt\.npz is for another architecture: n_embd: "
                                              r"checkpoint 16 vs model 32"):
        load_checkpoint(path, model=GPT(wider))
    with pytest.raises(CheckpointError, match="holds a GPT, not a RewardModel"):
        load_checkpoint(path, model=RewardModel(CFG))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        model = GPT(CFG)
        load_checkpoint(path, model=model, optimizer=AdamW(model.parameters(), lr=1.0))
    llama = GPTConfig(**{**vars(CFG), "norm": "rms", "pos": "rope", "mlp": "swiglu"})
    with pytest.raises(CheckpointError, match="norm: checkpoint 'layer' vs model 'rms'"):
        load_checkpoint(path, model=GPT(llama))


def test_a_checkpoint_written_before_the_llama_switches_restores_into_a_gpt2(tmp_path):
    """Its config lacks norm, pos, mlp, n_kv_head, ...: they are GPT-2's defaults."""
    old = {k: v for k, v in vars(CFG).items() if k in ("block_size", "vocab_size", "n_layer", "n_head",
                                                        "n_embd", "dropout", "bias", "dtype")}
    save_checkpoint(tmp_path / "old.npz", GPT(CFG), old)
    load_checkpoint(tmp_path / "old.npz", model=GPT(CFG))


def test_values_that_json_cannot_hold_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="cannot store extra/f"):
        save_checkpoint(tmp_path / "x.npz", GPT(CFG), CFG, extra={"f": object()})
    assert os.listdir(tmp_path) == []
