// LT_CHECK(cond, parts...): TORCH_CHECK without iostreams.
//
// TORCH_CHECK formats its message with c10::str, an ostringstream instantiated inside this library.
// Built by the device image's /opt/gcc g++ 13.3, that stream code ran against the system libstdc++ the
// process had loaded and segfaulted in std::basic_ostream::_M_insert<long> on the first failed check
// (cuda-gdb backtrace: bench/RESULTS.md, issue 11). Here the message is concatenated from std::string
// pieces (std::to_string, c10::toString, Device::str) and handed to c10::detail::torchCheckFail, the
// function TORCH_CHECK itself ends in: it lives in libc10, built with torch's own toolchain, and throws
// c10::Error, which Python sees as RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace ltengine {
namespace check {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(caffe2::TypeMeta t) { return std::string(t.name()); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string piece(T v) {
  return std::to_string(v);
}

template <typename... A>
std::string cat(const A&... parts) {
  std::string s;
  (s += ... += piece(parts));
  return s;
}

}  // namespace check
}  // namespace ltengine

#define LT_CHECK(cond, ...)                                                                              \
  do {                                                                                                   \
    if (C10_UNLIKELY(!(cond))) {                                                                         \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),                 \
                                    ::ltengine::check::cat(__VA_ARGS__));                                \
    }                                                                                                    \
  } while (0)
