// alter_kernels._C: the op schemas (TORCH_LIBRARY) and the Python module that loading the
// library needs. Kernels live in logits_cpu.cpp, moe_align_cpu.cpp, gated_asym_lora_cpu.cpp and, when built with
// CUDA, cuda_ops.cpp. Fake (meta) kernels for torch.compile are in alter_kernels/_ops_fake.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(alter_kernels, m) {
  // torch imports this module for the fake kernels when tracing needs them.
  m.set_python_module("alter_kernels._ops_fake");
  // row_max and log_sum: the max m of each row and log sum_i e^{z_i - m}, saved apart so
  // that the backward rebuilds p = e^{(z - m) - log_sum} exactly for logits of any size;
  // power_sum: P_q = sum_i p_i^q (1 for Shannon), which 1 - (q - 1) S would give inexactly.
  m.def(
      "entropy_forward(Tensor logits, float q) -> (Tensor entropy, Tensor row_max, Tensor log_sum, "
      "Tensor power_sum)");
  m.def(
      "entropy_backward(Tensor grad_entropy, Tensor logits, Tensor entropy, Tensor row_max, Tensor log_sum, "
      "Tensor power_sum, float q) -> Tensor");
  m.def(
      "ihl_forward(Tensor logits, Tensor labels, float q, float threshold, float high_entropy_weight, "
      "int ignore_index) -> (Tensor loss, Tensor entropy, Tensor weight, Tensor row_max, Tensor log_sum, "
      "Tensor runner_up)");
  m.def(
      "ihl_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor row_max, Tensor log_sum, "
      "Tensor runner_up, int ignore_index) -> Tensor");
  // The IHL, NLL and entropy of one logits tensor (ihl_forward's outputs and P_q), and the
  // gradient of any combination of the three in one pass.
  m.def(
      "token_losses_forward(Tensor logits, Tensor labels, float q, float threshold, float high_entropy_weight, "
      "int ignore_index) -> (Tensor loss, Tensor entropy, Tensor weight, Tensor row_max, Tensor log_sum, "
      "Tensor power_sum, Tensor runner_up)");
  m.def(
      "token_losses_backward(Tensor grad_nll, Tensor grad_ihl, Tensor grad_entropy, Tensor logits, Tensor labels, "
      "Tensor entropy, Tensor row_max, Tensor log_sum, Tensor power_sum, Tensor runner_up, float q, "
      "int ignore_index) -> Tensor");
  m.def("moe_align(Tensor experts, int num_experts, int block_m) -> (Tensor, Tensor, Tensor)");
  // out += the routed AsymLoRA delta of x (inference): stacked = [W_g; A], expand = s·B_cat^T.
  m.def(
      "gated_asym_lora_(Tensor(a!) out, Tensor x, Tensor stacked, Tensor entropy_weight, Tensor entropy, "
      "Tensor expand, int num_experts, float threshold, float tau_high, float tau_low, int k_high, int k_low, "
      "Tensor? experts) -> ()");
}

static PyModuleDef alter_kernels_c_module = {
    PyModuleDef_HEAD_INIT,
    "alter_kernels._C",
    "Compiled ALTER kernels; the ops are torch.ops.alter_kernels.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&alter_kernels_c_module);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
