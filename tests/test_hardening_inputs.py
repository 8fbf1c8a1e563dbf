"""Hostile input that never reaches a training loop: image files, output paths, checkpoint metadata, configs, hub
references. Each test asserts the exact outcome: the error and its message, or the value, and nothing left behind."""

import json
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from train_support import env

import maskbit
from maskbit import CheckpointError, ConfigError
from maskbit.checkpoints import FORMAT, MAX_STATE_VALUES, state_size
from maskbit.config import GeneratorConfig, TokenizerConfig, from_official_yaml
from maskbit.generator import Generator
from maskbit.presets import PRESETS, get_preset
from maskbit.tokenizer import Tokenizer
from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.images import MAX_PIXELS, load_image, safe_filename, save_images, save_png, to_rgb


def forged_png(path, width, height):
    """A valid 1x1 grey PNG whose header claims width x height (a decompression bomb as far as the header says)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Image files


def test_thin_png_is_cropped_before_it_is_resized(tmp_path):
    """1 x 400000 used to be resized to 256 x 102400000 (7.7 GB, 25 s) before the crop; now it is a 1x1 crop."""
    path = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 400_000), 77, np.uint8)).save(path)
    assert path.stat().st_size < 2000
    # peak memory from VmHWM (per address space, so it starts afresh at exec; ru_maxrss would include the forked
    # pytest parent's pages)
    script = ("import re, time, numpy as np\nfrom maskbit_runtime.images import load_image\n"
              f"t = time.perf_counter(); a = load_image({str(path)!r}, 256); t = time.perf_counter() - t\n"
              "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
              "print(a.shape, int(a.min()), int(a.max()), t, hwm)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=60,
                         check=True).stdout.split()
    assert out[:5] == ["(256,", "256,", "3)", "77", "77"]
    assert float(out[5]) < 5.0, out                     # seconds (25 s before; generous for a loaded machine)
    assert int(out[6]) < 600_000, out                   # peak RSS in KiB, interpreter and onnxruntime included


@pytest.mark.parametrize(("width", "height", "message"), [
    (9000, 9000, "9000x9000 = 81,000,000 pixels, above the limit of"),      # our limit, below Pillow's
    (100_000, 100_000, "is a decompression bomb"),                          # Pillow's own bomb check
])
def test_pixel_limit_is_one_clear_error(tmp_path, width, height, message):
    assert width * height > MAX_PIXELS
    path = forged_png(tmp_path / "bomb.png", width, height)
    start = time.perf_counter()
    with pytest.raises(InputError, match=message) as info:
        load_image(path, 64)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _image(mode, value, size=(4, 4)):
    return Image.new(mode, size, value)


@pytest.mark.parametrize(("image", "expected"), [
    (_image("1", 1), (255, 255, 255)),
    (_image("L", 100), (100, 100, 100)),
    (_image("LA", (100, 0)), (255, 255, 255)),                 # fully transparent -> the white background
    (_image("LA", (100, 255)), (100, 100, 100)),
    (_image("RGB", (10, 20, 30)), (10, 20, 30)),
    (_image("RGBA", (0, 0, 0, 0)), (255, 255, 255)),
    (_image("RGBA", (0, 0, 0, 255)), (0, 0, 0)),
    (_image("RGBA", (0, 0, 0, 128)), (127, 127, 127)),         # half transparent black over white
    (_image("CMYK", (0, 0, 0, 0)), (255, 255, 255)),
    (_image("YCbCr", (128, 128, 128)), (128, 128, 128)),
    (_image("I;16", 65535), (255, 255, 255)),                  # 16-bit: x 1/257
    (_image("I;16", 32896), (128, 128, 128)),
    (_image("I;16", 257), (1, 1, 1)),
    (_image("I", 65535), (255, 255, 255)),                     # 32-bit int: read as 16-bit data
    (_image("I", 25700), (100, 100, 100)),
    (_image("F", 0.0), (0, 0, 0)),                             # float: [0, 1] x 255
    (_image("F", 0.5), (128, 128, 128)),
    (_image("F", 1.0), (255, 255, 255)),
], ids=lambda v: v.mode if isinstance(v, Image.Image) else "")
def test_every_mode_follows_one_rule(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.asarray(rgb)[0, 0].tolist() == list(expected)


def test_palette_with_alpha_is_composited_on_white():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    pa = Image.new("PA", (2, 2), (1, 255))
    pa.putpalette([255, 0, 0, 0, 0, 255])
    assert np.asarray(to_rgb(pa))[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(("image", "message"), [
    (_image("F", 2.0), r"float \(mode F\) values must lie in \[0, 1\], found 2..2"),
    (_image("F", -0.5), r"float \(mode F\) values must lie in \[0, 1\], found -0.5..-0.5"),
    (_image("F", float("nan")), r"mode F\) values must lie in \[0, 1\], found no finite value and NaN/inf"),
    (_image("I", -1), r"mode I values -1..-1 are outside 0..65535"),
    (_image("I", 70000), r"mode I values 70000..70000 are outside 0..65535"),
])
def test_out_of_range_high_bit_images_are_refused(image, message):
    with pytest.raises(InputError, match=message) as info:
        to_rgb(image, "x.tif")
    assert str(info.value).startswith("image x.tif: ") and "\n" not in str(info.value)


def test_16bit_png_loads_scaled_not_white(tmp_path):
    values = np.tile(np.array([0, 257 * 64, 257 * 200, 65535], np.uint16), (4, 1))   # columns: 0, 64, 200, 255
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    from maskbit.train.data import ImageSource, Record
    source = ImageSource([Record(str(tmp_path / "g16.png"), 0)])
    loaded = np.asarray(source.load(0))
    assert loaded[0, :, 0].tolist() == [0, 64, 200, 255] and source.corrupt == {}


# ---------------------------------------------------------------------------------------------------------------
# Writing images


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "out.png"
    images = [np.full((64, 64, 3), i * 20, np.uint8) for i in range(8)]
    errors = []

    def write(image):
        try:
            for _ in range(5):
                save_png(image, target)
        except Exception as exc:   # noqa: BLE001 (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(image,)) for image in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = np.asarray(Image.open(target))
    assert any(np.array_equal(final, image) for image in images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_failed_write_leaves_no_temporary_file_and_keeps_the_old_image(tmp_path, monkeypatch):
    target = save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png")
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="No space left"):
        save_png(np.ones((8, 8, 3), np.uint8), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize("name", ["x.jpg", "x.JPEG", "x.webp", "x.tiff"])
def test_out_with_another_image_suffix_is_refused(tmp_path, name):
    with pytest.raises(InputError, match=f"--out .*{name}: only PNG is written; give a .png file"):
        save_images(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_directory_out_uses_safe_names(tmp_path):
    written = save_images(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "dir", ["../../escape", ".hidden"])
    assert [p.name for p in written] == ["___escape.png", "hidden.png"]
    assert all(p.parent == tmp_path / "dir" for p in written)


@pytest.mark.parametrize(("text", "expected"), [
    ("tiger cat", "tiger_cat"),
    ("  a \t b  ", "a_b"),
    ("../../etc/passwd", "___etc_passwd"),
    ("a/b\\c", "a_b_c"),
    ("..", "_"),
    ("...hidden", "hidden"),
    ("\x00\x1b[31mred\x7f", "__[31mred_"),
    ("", "_"),
    ("   ", "_"),
    ("line\nbreak", "line_break"),
])
def test_safe_filename(text, expected):
    assert safe_filename(text) == expected


def test_safe_filename_caps_length_in_bytes():
    name = safe_filename("é" * 500)
    assert 0 < len(name.encode()) <= 200 and set(name) == {"é"}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint metadata


def test_state_size_is_exact_for_every_preset_and_the_limit_is_twice_the_largest():
    largest = 0
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            pairs = [("tokenizer", Tokenizer(cfg.tokenizer))]
            if cfg.generator is not None:
                pairs.append(("generator", Generator(cfg.generator)))
        for kind, model in pairs:
            actual = sum(v.numel() for v in model.state_dict().values())
            assert state_size(cfg, kind) == actual, (name, kind)
            largest = max(largest, actual)
    assert 2 * largest <= MAX_STATE_VALUES < 2.2 * largest


def _stored(tmp_path, config: dict, tensors=None, kind="generator"):
    path = tmp_path / "model.safetensors"
    save_file(tensors or {"w": torch.zeros(3)}, str(path),
              metadata={"format": FORMAT, "kind": kind, "config": json.dumps(config)})
    return path


def test_metadata_asking_for_a_huge_model_is_refused_before_building(tmp_path, monkeypatch):
    config = get_preset("tiny_lfq10").to_dict()
    config["generator"].update(hidden_dim=8192, depth=512, heads=16, mlp_dim=32768)      # ~400 G values
    path = _stored(tmp_path, config)

    def no_build(*args, **kwargs):
        raise AssertionError("a module was built")
    monkeypatch.setattr(maskbit.Generator, "__init__", no_build)
    with pytest.raises(CheckpointError, match=r"describes a generator of [\d,]+ values .* above the limit of "
                                              r"640,000,000; the file is corrupt"):
        maskbit.load_generator(path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("depth", True, "generator.depth must be an integer, got True"),
    ("depth", 2.5, "generator.depth must be an integer, got 2.5"),
    ("depth", -1, "generator.depth must be >= 0|generator.depth must be in 0..1024, got -1"),
    ("dropout", 1.0, r"generator.dropout must be in \[0, 1\), got 1.0"),
    ("num_classes", "1000", "generator.num_classes must be an integer, got '1000'"),
])
def test_metadata_with_bad_types_or_ranges_is_refused(tmp_path, field, value, message):
    config = get_preset("tiny_lfq10").to_dict()
    config["generator"][field] = value
    with pytest.raises(CheckpointError, match=f"model.safetensors carries an unreadable config: {message}"):
        maskbit.load_generator(_stored(tmp_path, config))


def test_metadata_that_disagrees_with_the_tensors_is_refused_before_reading_them(tmp_path):
    cfg = get_preset("tiny_lfq10")
    state = maskbit.build_generator(cfg).state_dict()
    state.pop("prediction_layer.weight")
    path = _stored(tmp_path, cfg.to_dict(), {k: v.contiguous() for k, v in state.items()})
    with pytest.raises(CheckpointError, match=r"stored config describes a generator of [\d,]+ values but the file "
                                              r"holds [\d,]+ in \d+ tensors"):
        maskbit.load_generator(path)


def test_metadata_that_is_not_a_config_object(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "kind": "generator", "config": "[1, 2]"})
    with pytest.raises(CheckpointError, match="carries an unreadable config: expected an object"):
        maskbit.load_generator(path)


# ---------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (TokenizerConfig, {"token_size": True}, r"tokenizer.token_size must be an integer, got True \(bool\)"),
    (TokenizerConfig, {"token_size": 25}, "tokenizer.token_size must be in 1..24, got 25"),
    (TokenizerConfig, {"token_size": 12.0}, r"tokenizer.token_size must be an integer, got 12.0 \(float\)"),
    (TokenizerConfig, {"hidden_channels": -128}, "tokenizer.hidden_channels must be in 1..4096, got -128"),
    (TokenizerConfig, {"channel_mult": "12245"}, "tokenizer.channel_mult must be a list of integers"),
    (TokenizerConfig, {"channel_mult": (1, 1, 2, 2, 0)}, r"tokenizer.channel_mult\[4\] must be in 1..64, got 0"),
    (TokenizerConfig, {"commitment_cost": float("nan")}, "tokenizer.commitment_cost must be a finite number"),
    (TokenizerConfig, {"entropy_loss_temperature": 0}, "tokenizer.entropy_loss_temperature must be > 0"),
    (TokenizerConfig, {"sample_with_conv": "yes"}, "tokenizer.sample_with_conv must be true or false"),
    (TokenizerConfig, {"quantizer_type": ["lookup"]}, "tokenizer.quantizer_type .* is not supported"),
    (GeneratorConfig, {"dropout": 1.0}, r"generator.dropout must be in \[0, 1\), got 1.0"),
    (GeneratorConfig, {"class_label_dropout": -0.1}, r"generator.class_label_dropout must be in \[0, 1\)"),
    (GeneratorConfig, {"heads": 0}, "generator.heads must be in 1..1024, got 0"),
    (GeneratorConfig, {"codebook_size": 2 ** 25}, "generator.codebook_size must be in 2..16777216"),
    (GeneratorConfig, {"codebook_size": 1000}, "generator.codebook_size must be a power of two, got 1000"),
    (GeneratorConfig, {"use_prenorm": 2}, "generator.use_prenorm must be true or false, got 2"),
])
def test_config_fields_are_type_and_range_checked(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize(("yaml", "message"), [
    ("model:\n  vq_model:\n    token_size: true\n", "tokenizer.token_size must be an integer, got True"),
    ("model:\n  vq_model:\n    num_res_blocks: -2\n", "tokenizer.num_res_blocks must be in 1..16, got -2"),
    ("model:\n  vq_model: {}\ndataset:\n  preprocessing:\n    resolution: big\n",
     "tokenizer.resolution must be an integer, got 'big'"),
    ("model:\n  vq_model: 7\n", "model.vq_model must be a mapping, got 7"),
    ("model: [1]\n", "model must be a mapping"),
    ("model:\n  vq_model: {}\n  mlm_model:\n    dropout: 1.5\n", r"generator.dropout must be in \[0, 1\), got 1.5"),
    ("model:\n  vq_model: {}\n  mlm_model:\n    depth: 24.5\n", "generator.depth must be an integer, got 24.5"),
    ("model:\n  vq_model: {}\nlosses: 3\n", "losses must be a mapping, got 3"),
    ("model: [\n", "cannot read config"),
])
def test_yaml_values_are_checked(tmp_path, yaml, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError, match=message):
        from_official_yaml(path)


# ---------------------------------------------------------------------------------------------------------------
# hf:// references


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")      # nothing listens on the discard port
    return tmp_path / "hub"


def test_uncached_hub_file_without_network_fails_within_seconds(empty_hub):
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        maskbit.load_tokenizer("hf://markweber/not_cached", "tiny_lfq10")
    assert time.perf_counter() - start < 8
    text = str(info.value)
    assert "\n" not in text and text.startswith("cannot fetch hf://markweber/not_cached: none of ")
    assert f"is in the local cache ({empty_hub / 'models--markweber--not_cached'})" in text
    assert "(offline: http://127.0.0.1:9 is unreachable (" in text


def test_cached_hub_file_loads_without_touching_the_network(empty_hub, tmp_path):
    tok = maskbit.build_tokenizer("tiny_lfq10")
    snapshot = empty_hub / "models--markweber--tok" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    torch.save(tok.state_dict(), snapshot / "tok.bin")
    (empty_hub / "models--markweber--tok" / "refs").mkdir()
    (empty_hub / "models--markweber--tok" / "refs" / "main").write_text("b" * 40)
    start = time.perf_counter()
    loaded = maskbit.load_tokenizer("hf://markweber/tok", "tiny_lfq10")
    assert time.perf_counter() - start < 2
    assert torch.equal(loaded.state_dict()["encoder.conv_in.weight"], tok.state_dict()["encoder.conv_in.weight"])


def test_errors_are_maskbit_errors():
    assert issubclass(CheckpointError, MaskbitError) and issubclass(ConfigError, MaskbitError)
