"""Checkpoint loading: official .bin, safetensors with config, hub cache, and the errors a user can hit."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import maskbit
from maskbit import CheckpointError, ConfigError


@pytest.fixture
def tiny_files(tmp_path):
    torch.manual_seed(0)
    tok = maskbit.build_tokenizer("tiny_lfq10")
    gen = maskbit.build_generator("tiny_lfq10")
    torch.save(tok.state_dict(), tmp_path / "tok.bin")
    official_gen = {("token_emb" + k[len("input_proj"):] if k.startswith("input_proj") else k): v
                    for k, v in gen.state_dict().items()}
    torch.save(official_gen, tmp_path / "gen.bin")
    return tmp_path, tok, gen


def test_official_bin_round_trip_with_token_emb_rename(tiny_files):
    path, tok, gen = tiny_files
    tok2 = maskbit.load_tokenizer(path / "tok.bin", "tiny_lfq10")
    gen2 = maskbit.load_generator(path / "gen.bin", "tiny_lfq10")
    for a, b in ((tok, tok2), (gen, gen2)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_safetensors_carry_their_config(tiny_files, tmp_path):
    path, tok, gen = tiny_files
    cfg = maskbit.with_sampling(maskbit.get_preset("tiny_lfq10"), num_steps=5)
    maskbit.save_tokenizer(tok, tmp_path / "tok.safetensors", cfg)
    maskbit.save_generator(gen, tmp_path / "gen.safetensors", cfg)
    tok2 = maskbit.load_tokenizer(tmp_path / "tok.safetensors")          # no config argument needed
    gen2 = maskbit.load_generator(tmp_path / "gen.safetensors")
    assert tok2.config == tok.config and gen2.config == gen.config
    assert gen2.sampling_config == cfg.sampling
    assert torch.equal(gen2.pos_emb, gen.pos_emb)
    with pytest.raises(CheckpointError, match="is a generator checkpoint, not a tokenizer"):
        maskbit.load_tokenizer(tmp_path / "gen.safetensors")
    with pytest.raises(ConfigError, match="carries no config"):
        maskbit.load_tokenizer(path / "tok.bin")


def test_directory_with_pytorch_model_bin(tiny_files, tmp_path):
    path, tok, _ = tiny_files
    (tmp_path / "ckpt").mkdir()
    (path / "tok.bin").rename(tmp_path / "ckpt" / "pytorch_model.bin")
    assert maskbit.load_tokenizer(tmp_path / "ckpt", "tiny_lfq10").config == tok.config


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.bin"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "payload": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused to load.*arbitrary code"):
        maskbit.load_tokenizer(evil, "tiny_lfq10")
    with open(tmp_path / "plain.pkl", "wb") as f:        # a bare pickle (not torch zip) with a payload
        pickle.dump(_Payload(), f)
    with pytest.raises(CheckpointError):
        maskbit.load_tokenizer(tmp_path / "plain.pkl", "tiny_lfq10")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_truncated_file_gives_one_line_error(tiny_files):
    path, _, _ = tiny_files
    data = (path / "tok.bin").read_bytes()
    (path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        maskbit.load_tokenizer(path / "cut.bin", "tiny_lfq10")
    assert "\n" not in str(err.value)
    (path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        maskbit.load_tokenizer(path / "cut.safetensors", "tiny_lfq10")


def test_wrong_bit_width_names_keys_and_suggests_config(tmp_path):
    real = maskbit.build_tokenizer("maskbit_tokenizer_12bit")
    torch.save(real.state_dict(), tmp_path / "tok12.bin")
    with pytest.raises(CheckpointError) as err:
        maskbit.load_tokenizer(tmp_path / "tok12.bin", "maskbit_tokenizer_14bit")
    message = str(err.value)
    assert "\n" not in message
    assert "mis-shaped" in message and "encoder.conv_out.weight [12, 512, 1, 1] vs [14, 512, 1, 1]" in message
    assert "12-bit lookup-free tokenizer" in message and "maskbit_tokenizer_12bit" in message


def test_tokenizer_passed_as_generator(tiny_files):
    path, _, _ = tiny_files
    with pytest.raises(CheckpointError, match="is a tokenizer checkpoint, not a generator; use load_tokenizer"):
        maskbit.load_generator(path / "tok.bin", "tiny_lfq10")
    with pytest.raises(CheckpointError, match="is a generator checkpoint, not a tokenizer"):
        maskbit.load_tokenizer(path / "gen.bin", "tiny_lfq10")


def test_generator_with_wrong_groups_suggests_what_it_is(tiny_files):
    path, _, _ = tiny_files
    with pytest.raises(CheckpointError, match="10-bit generator with 2 groups") as err:
        maskbit.load_generator(path / "gen.bin", "tiny_lfq6_g1")
    assert "missing" in str(err.value) or "mis-shaped" in str(err.value)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        maskbit.load_tokenizer("/nonexistent/tok.bin", "tiny_lfq10")


def test_hub_reference_resolves_offline_from_a_populated_cache(tiny_files, tmp_path):
    path, tok, _ = tiny_files
    snapshot = tmp_path / "hub" / "models--markweber--maskbit_tokenizer_tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "maskbit_tokenizer_tiny.bin").write_bytes((path / "tok.bin").read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    script = textwrap.dedent("""
        import maskbit, sys
        tok = maskbit.load_tokenizer("hf://markweber/maskbit_tokenizer_tiny", "tiny_lfq10")
        print("loaded", tok.config.token_size)
        try:
            maskbit.load_tokenizer("hf://markweber/not_cached", "tiny_lfq10")
        except maskbit.CheckpointError as exc:
            print("error", exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded 10" in result.stdout
    assert "error cannot fetch hf://markweber/not_cached" in result.stdout and "offline" in result.stdout
