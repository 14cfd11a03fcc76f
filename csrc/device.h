// Device facts the launchers size their grids by, looked up once per device, and the launch with
// programmatic dependent launch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace ltengine {

inline int multiprocessor_count(int device) {
  static int cache[64] = {};  // per device; benign race: every writer stores the same value
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// Programmatic dependent launch is used on sm_90+ unless LTENGINE_PDL=0 (a switch for side-by-side runs).
inline bool pdl_enabled(int device) {
  static int cache[64] = {};  // 1: on, 2: off; benign race as above
  if (device < 0 || device >= 64) return false;
  if (cache[device] == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    const char* env = std::getenv("LTENGINE_PDL");
    cache[device] = major >= 9 && !(env != nullptr && std::strcmp(env, "0") == 0) ? 1 : 2;
  }
  return cache[device] == 1;
}

// kernel<<<grid, block, smem, stream>>>(args...), where `pdl` lets it start while the previous kernel in the
// stream finishes (it must grid_dep_wait before touching that kernel's data: ptx.h). Works under CUDA-graph
// capture (a programmatic edge).
template <typename... P, typename... A>
void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

}  // namespace ltengine
