"""The speed layer: matmul kernels chosen by measuring, attention, int8 matmuls, and gpt2load's own C kernels
(sources in csrc/, built once per machine)."""
