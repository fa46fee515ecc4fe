// The parts of the nuq._nuq module, each defined in its own file.
#pragma once

#include <pybind11/pybind11.h>

namespace nuq::python {
void bind_layers(pybind11::module_& m);      // layers.cpp: PackedLayer, quantize, linear, checkpoints
void bind_statistics(pybind11::module_& m);  // statistics.cpp: accumulators, Hutchinson, bit allocation
void bind_checkpoint_quantizer(pybind11::module_& m);  // statistics.cpp: quantize_checkpoint
void bind_kv(pybind11::module_& m);          // kv.cpp: KV-cache calibration
void bind_cuda(pybind11::module_& m);        // cuda.cpp: CUDA launchers over device pointers
void bind_tasks(pybind11::module_& m);       // tasks.cpp: calibrate, fisher, evaluate, generate, convert
}  // namespace nuq::python
