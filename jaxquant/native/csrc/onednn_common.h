// What jaxquant_native.cc and onednn_matmul_pool.cc share: one oneDNN CPU engine for the whole
// extension and a scope guard over the calling thread's OpenMP thread count.
#pragma once

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"

namespace jaxquant_native {

// Inline, so both translation units get the same engine (a primitive and the memory it runs on
// must share an engine).
inline dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Sets the calling thread's OpenMP thread count for its scope. oneDNN sizes a primitive's work
// split by omp_get_max_threads() when it is created and runs it with the count at execution, so
// both happen inside the same guard; the ICV is per thread, so XLA's other threads are unaffected.
class OmpThreads {
 public:
  explicit OmpThreads(bool single) : saved_(omp_get_max_threads()), active_(single && saved_ > 1) {
    if (active_) omp_set_num_threads(1);
  }
  ~OmpThreads() {
    if (active_) omp_set_num_threads(saved_);
  }

 private:
  int saved_;
  bool active_;
};

}  // namespace jaxquant_native
