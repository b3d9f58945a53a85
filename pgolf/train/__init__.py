"""Training: Muon + AdamW optimizers, LR/momentum schedules, the wall-clock budget and the weight EMA."""

from pgolf.train.ema import EMA
from pgolf.train.muon import CLASSIC_COEFFS, POLAR_EXPRESS_COEFFS, Muon, ns_coefficients, orthogonality_error
from pgolf.train.optim import Optimizers, build_optimizers
from pgolf.train.schedule import WallClock, lr_multiplier, lr_multiplier_iters, muon_momentum

__all__ = ["CLASSIC_COEFFS", "EMA", "Muon", "Optimizers", "POLAR_EXPRESS_COEFFS", "WallClock", "build_optimizers",
           "lr_multiplier", "lr_multiplier_iters", "muon_momentum", "ns_coefficients", "orthogonality_error"]
