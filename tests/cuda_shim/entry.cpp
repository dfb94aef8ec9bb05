// C entry points of the shim-built kernels for ctypes (tests/cuda_shim/emulation.py): the same
// calls bindings.cpp makes into csrc/cuda/kernels.cu, with the error text copied out. Tests only.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cuda_ops.h"
#include "shim_half.h"

#define SHIM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

template <class T>
T* as_pointer(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

int report(const char* error, char* out, int size) {
  if (error == nullptr) return 0;
  snprintf(out, static_cast<size_t>(size), "%s", error);
  return 1;
}

fusedclip::cuda::PlanArgs plan_args(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                                    int64_t device, int64_t stream) {
  fusedclip::cuda::PlanArgs plan;
  plan.packed = as_pointer<const int64_t>(packed);
  plan.num_tensors = num_tensors;
  plan.num_chunks = num_chunks;
  plan.chunk_elements = chunk_elements;
  plan.device = static_cast<int>(device);
  plan.stream = as_pointer<void>(stream);
  return plan;
}

// The norm scale of general p (NormArgs::norm_scale_ptr) where this kernels.cu has one.
template <class Args>
auto set_norm_scale(Args& args, int64_t address, int) -> decltype(args.norm_scale_ptr, void()) {
  args.norm_scale_ptr = as_pointer<const double>(address);
}
template <class Args>
void set_norm_scale(Args&, int64_t, long) {}

}  // namespace

SHIM_EXPORT int cuda_shim_norm_units(int64_t device, int64_t num_chunks, int64_t chunk_elements, int64_t* units,
                                     char* error, int error_size) {
  const char* message = nullptr;
  *units = fusedclip::cuda::norm_units(static_cast<int>(device), num_chunks, chunk_elements, &message);
  return report(message, error, error_size);
}

SHIM_EXPORT int cuda_shim_norm(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                               int64_t device, int64_t stream, int64_t kind, double p, int64_t total_out,
                               int64_t total_dtype, int64_t acc_out, int64_t coef_out, double max_norm,
                               int64_t max_norm_ptr, int64_t max_norm_dtype, int64_t scale_ptr, int64_t scale_dtype,
                               int64_t per_tensor_out, int64_t partials, int64_t counters, int64_t norm_scale_ptr,
                               char* error, int error_size) {
  fusedclip::cuda::NormArgs args{};  // fields this file does not know stay zero / null
  args.kind = static_cast<int>(kind);
  args.p = p;
  args.total_out = as_pointer<void>(total_out);
  args.total_dtype = static_cast<int>(total_dtype);
  args.acc_out = as_pointer<double>(acc_out);
  args.coef_out = as_pointer<double>(coef_out);
  args.max_norm = max_norm;
  args.max_norm_ptr = as_pointer<const void>(max_norm_ptr);
  args.max_norm_dtype = static_cast<int>(max_norm_dtype);
  args.scale_ptr = as_pointer<const void>(scale_ptr);
  args.scale_dtype = static_cast<int>(scale_dtype);
  args.per_tensor_out = as_pointer<double>(per_tensor_out);
  args.partials = as_pointer<double>(partials);
  args.ticket = as_pointer<unsigned int>(counters);
  set_norm_scale(args, norm_scale_ptr, 0);
  const fusedclip::cuda::PlanArgs plan = plan_args(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  return report(fusedclip::cuda::norm(plan, args), error, error_size);
}

SHIM_EXPORT int cuda_shim_scale(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                                int64_t device, int64_t stream, int64_t coef_ptr, int64_t coef_dtype, char* error,
                                int error_size) {
  const fusedclip::cuda::PlanArgs plan = plan_args(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  return report(fusedclip::cuda::scale(plan, as_pointer<const void>(coef_ptr), static_cast<int>(coef_dtype)), error,
                error_size);
}

SHIM_EXPORT int cuda_shim_clamp(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                                int64_t device, int64_t stream, double clip_value, char* error, int error_size) {
  const fusedclip::cuda::PlanArgs plan = plan_args(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  return report(fusedclip::cuda::clamp(plan, clip_value), error, error_size);
}

SHIM_EXPORT int cuda_shim_device_count(int* count, char* error, int error_size) {
  const char* message = nullptr;
  *count = fusedclip::cuda::device_count(&message);
  return report(message, error, error_size);
}

// The shim's 16-bit conversions over arrays, for the tests that compare them with numpy and torch.
// kind 0: half bits -> float, 1: bf16 bits -> float, 2: float -> half bits, 3: float -> bf16 bits,
// 4: double -> half bits, 5: double -> bf16 bits.
SHIM_EXPORT void cuda_shim_convert(int kind, const void* in, void* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0:
        static_cast<float*>(out)[i] = __half2float(__ushort_as_half(static_cast<const uint16_t*>(in)[i]));
        break;
      case 1:
        static_cast<float*>(out)[i] = __bfloat162float(__ushort_as_bfloat16(static_cast<const uint16_t*>(in)[i]));
        break;
      case 2:
        static_cast<uint16_t*>(out)[i] = __half_as_ushort(__float2half_rn(static_cast<const float*>(in)[i]));
        break;
      case 3:
        static_cast<uint16_t*>(out)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<const float*>(in)[i]));
        break;
      case 4:
        static_cast<uint16_t*>(out)[i] = __half_as_ushort(__double2half(static_cast<const double*>(in)[i]));
        break;
      default:
        static_cast<uint16_t*>(out)[i] = __bfloat16_as_ushort(__double2bfloat16(static_cast<const double*>(in)[i]));
    }
  }
}
