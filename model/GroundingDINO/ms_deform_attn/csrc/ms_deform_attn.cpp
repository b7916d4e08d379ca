// Python bindings of the deformable-attention CUDA op.
#include <torch/extension.h>

#include "ms_deform_attn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ChatterBox multi-scale deformable attention (CUDA)";
  m.def("forward", &chatterbox_msda::forward, "forward(value, spatial_shapes, level_start_index, "
        "sampling_locations, attention_weights, channels_per_thread=0) -> output",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("channels_per_thread") = 0);
  m.def("backward", &chatterbox_msda::backward, "backward(value, spatial_shapes, level_start_index, "
        "sampling_locations, attention_weights, grad_output, channels_per_thread=0) -> "
        "[grad_value, grad_sampling_locations, grad_attention_weights]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::arg("channels_per_thread") = 0);
}
