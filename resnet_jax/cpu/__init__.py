"""Speed-ups for training on the CPU backend only; nothing here is needed elsewhere.

- `fast_conv`: convolutions whose gradients XLA:CPU runs fast (the `model.conv` paths);
- `native_conv`: direct convolution kernels (`native/conv_cpu.cc`) called through XLA's FFI;
- `allocator`: glibc keeps XLA:CPU's per-step scratch memory instead of faulting it in anew.

The models never import this package: the training side passes its convolution to them.
"""
