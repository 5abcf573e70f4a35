"""StyleGAN2 (rosinality layout): generator, discriminator, ops and per-sample weight helpers."""
from .discriminator import Discriminator
from .generator import Generator, SynthesisOutput, channel_table
from .per_sample import call_with_params, expand_params, take_sample

__all__ = ["Generator", "Discriminator", "SynthesisOutput", "channel_table", "expand_params",
           "call_with_params", "take_sample"]
