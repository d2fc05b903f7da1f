"""The model and its data, with nothing above them: dictionary and data (fairseq's formats), the model config and
presets, the network, its CPU kernels, the optimizer and schedule, and fairseq's checkpoint format. Imports nothing
from training, inference or the command line."""
