#include "nuq/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "nuq/half.hpp"

namespace nuq {

Shape::Shape(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) push_back(d);
}

void Shape::push_back(int64_t d) {
  NUQ_CHECK(rank_ < kMaxRank, Errc::unsupported, "tensor rank above {} is not supported", kMaxRank);
  NUQ_CHECK(d >= 0, Errc::invalid_argument, "negative dimension {}", d);
  dims_[rank_++] = d;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) {
    NUQ_CHECK(!__builtin_mul_overflow(n, dims_[i], &n), Errc::invalid_argument,
              "shape {} has more elements than fit in int64", to_string(*this));
  }
  return n;
}

bool operator==(const Shape& a, const Shape& b) noexcept {
  if (a.rank_ != b.rank_) return false;
  for (int i = 0; i < a.rank_; ++i)
    if (a.dims_[i] != b.dims_[i]) return false;
  return true;
}

std::string to_string(const Shape& shape) {
  std::string s = "[";
  for (int i = 0; i < shape.rank(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides;
  for (int i = 0; i < shape.rank(); ++i) strides.push_back(0);
  int64_t s = 1;
  for (int i = shape.rank() - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i] ? shape[i] : 1;
  }
  return strides;
}

void Buffer::AlignedDelete::operator()(std::byte* p) const noexcept { std::free(p); }

Buffer::Buffer(DType dtype, Shape shape) : dtype_(dtype), shape_(shape) {
  nbytes_ = std::size_t(shape.numel()) * dtype_size(dtype);
  // aligned_alloc wants a size that is a multiple of the alignment; a zero-size buffer still gets a
  // valid pointer so views into it are never null.
  std::size_t alloc = (nbytes_ + kAlignment - 1) / kAlignment * kAlignment;
  if (alloc == 0) alloc = kAlignment;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(kAlignment, alloc));
  if (!p) fail(Errc::io, "out of memory allocating {} bytes for a {} tensor of shape {}", alloc,
               dtype_name(dtype), to_string(shape));
  std::memset(p, 0, alloc);
  data_.reset(p);
}

Buffer to_float32(ConstTensorView src) {
  NUQ_CHECK(src.is_contiguous(), Errc::invalid_argument, "to_float32: tensor of shape {} is not contiguous",
            to_string(src.shape()));
  Buffer out(DType::F32, src.shape());
  const auto n = std::size_t(src.numel());
  float* dst = out.data_as<float>();
  // Checkpoint tensors may sit at any byte offset inside a mapped file, so copy rather than cast
  // when the source is not aligned for its type.
  switch (src.dtype()) {
    case DType::F32:
      std::memcpy(dst, src.data(), n * 4);
      break;
    case DType::F16:
    case DType::BF16: {
      constexpr std::size_t kChunk = 4096;
      uint16_t tmp[kChunk];
      for (std::size_t i = 0; i < n; i += kChunk) {
        std::size_t m = n - i < kChunk ? n - i : kChunk;
        std::memcpy(tmp, src.data() + 2 * i, 2 * m);
        if (src.dtype() == DType::F16)
          convert_fp16_to_float(tmp, dst + i, m);
        else
          convert_bf16_to_float(tmp, dst + i, m);
      }
      break;
    }
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, src.data() + 8 * i, 8);
        dst[i] = float(v);
      }
      break;
    default:
      fail(Errc::unsupported, "to_float32: cannot convert {} (only F32, F16, BF16, F64)", dtype_name(src.dtype()));
  }
  return out;
}

}  // namespace nuq
