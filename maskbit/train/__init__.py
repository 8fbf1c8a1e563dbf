"""Training of both MaskBit stages (tokenizer and generator) with the published recipe (MASKBIT_SPEC section 6).

    from maskbit.train import RunOptions, train_tokenizer
    result = train_tokenizer(RunOptions(config="tiny_lfq10", data="photos/", output_dir="runs/tok", max_steps=300))
    result.final_eval["psnr"], result.export_path     # EMA weights, loadable with maskbit.load_tokenizer(path)

Under `torchrun --nproc_per_node N` the same call trains with DistributedDataParallel.
"""

from .data import DataError
from .loop_generator import train_generator
from .loop_tokenizer import train_tokenizer
from .runner import RunOptions, TrainResult
from .settings import TrainSettings, build_settings

__all__ = ["DataError", "RunOptions", "TrainResult", "TrainSettings", "build_settings", "train_generator",
           "train_tokenizer"]
