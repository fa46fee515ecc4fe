# NUQ_CUDA=EMULATED: kernels/*.cu compiled as C++ against the HIP CPU Runtime (ROCm/HIP-CPU,
# header-only) and the stand-in CUDA headers in kernels/emulation, so that nuq::cuda, everything linked
# to it (CLI, examples, Python module) and the CUDA tests run on the CPU. The runtime is used in place
# from NUQ_HIP_CPU_DIR (cache), $NUQ_HIP_CPU_DIR, or ../shared/third_party/hip-cpu; it is never copied
# into this repository. Without it the build goes on without CUDA and one ctest reports the emulated
# tests as skipped, with the reason.

set(_nuq_hip_cpu_candidates "${NUQ_HIP_CPU_DIR}" "$ENV{NUQ_HIP_CPU_DIR}" "${PROJECT_SOURCE_DIR}/../shared/third_party/hip-cpu")
set(NUQ_HIP_CPU_INCLUDE "")
foreach(_dir IN LISTS _nuq_hip_cpu_candidates)
  if(_dir AND EXISTS "${_dir}/include/hip/hip_runtime.h")
    get_filename_component(NUQ_HIP_CPU_INCLUDE "${_dir}/include" ABSOLUTE)
    break()
  endif()
endforeach()

find_package(TBB QUIET)
if(NOT NUQ_HIP_CPU_INCLUDE)
  set(NUQ_CUDA_EMULATION_MISSING "the HIP CPU Runtime was not found (set NUQ_HIP_CPU_DIR; tried: ${_nuq_hip_cpu_candidates})")
elseif(NOT TBB_FOUND)
  set(NUQ_CUDA_EMULATION_MISSING "TBB was not found (Debian: libtbb-dev); the HIP CPU Runtime runs blocks on it")
endif()

if(NUQ_CUDA_EMULATION_MISSING)
  message(WARNING "nuq: NUQ_CUDA=EMULATED, but ${NUQ_CUDA_EMULATION_MISSING}. Building without CUDA; the emulated CUDA tests report as skipped.")
else()
  message(STATUS "nuq: CUDA kernels emulated on the CPU with the HIP CPU Runtime at ${NUQ_HIP_CPU_INCLUDE}")
  set(NUQ_HAVE_CUDA ON)
  set(NUQ_CUDA_EMULATED ON)
endif()

# The emulated nuq::cuda. .cu files are compiled as C++ (CMP0119: the LANGUAGE property selects the
# compiler and -x c++); the stand-in headers come before any system CUDA headers, for the library and
# for everything that links it (the CUDA tests include <cuda_runtime_api.h> and <cublas_v2.h>).
function(nuq_add_emulated_cuda_library name)
  foreach(_src IN LISTS ARGN)
    if(_src MATCHES "\\.cu$")
      set_source_files_properties(${_src} PROPERTIES LANGUAGE CXX)
    endif()
  endforeach()
  add_library(${name} ${ARGN})
  target_include_directories(${name} BEFORE PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/kernels/emulation>)
  target_include_directories(${name} SYSTEM PUBLIC $<BUILD_INTERFACE:${NUQ_HIP_CPU_INCLUDE}>)
  target_compile_definitions(${name} PUBLIC NUQ_WITH_CUDA=1 NUQ_CUDA_EMULATED=1)
  target_link_libraries(${name} PUBLIC nuq TBB::tbb Threads::Threads)
  # HIP-CPU's headers: GCC's simd attribute on every __device__/__global__ function, parentheses in
  # libco. They are not nuq's warnings to fix.
  target_compile_options(${name} PRIVATE -Wall -Wno-attributes -Wno-unknown-pragmas)
endfunction()
