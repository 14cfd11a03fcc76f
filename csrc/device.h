// Device facts the launchers size their grids by, looked up once per device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

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

}  // namespace ltengine
