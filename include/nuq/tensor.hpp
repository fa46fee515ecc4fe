// Tensor views and owning buffers. A view is a pointer, a dtype, a shape and strides (in elements,
// row-major by default); it never owns memory, so views into memory-mapped checkpoints cost nothing.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>

#include "nuq/dtype.hpp"
#include "nuq/error.hpp"

namespace nuq {

// A small fixed-capacity list of dimensions: tensors in checkpoints have at most a handful, and a
// fixed array keeps views trivially copyable and allocation-free.
class Shape {
 public:
  static constexpr int kMaxRank = 8;

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(int64_t(*first));
  }

  int rank() const noexcept { return rank_; }
  int64_t operator[](int i) const noexcept { return dims_[i]; }
  int64_t& operator[](int i) noexcept { return dims_[i]; }
  const int64_t* begin() const noexcept { return dims_.data(); }
  const int64_t* end() const noexcept { return dims_.data() + rank_; }
  void push_back(int64_t d);
  // Product of the dimensions (1 for rank 0); throws on overflow of int64.
  int64_t numel() const;

  friend bool operator==(const Shape& a, const Shape& b) noexcept;
  friend bool operator!=(const Shape& a, const Shape& b) noexcept { return !(a == b); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

// "[4096, 11008]"
std::string to_string(const Shape& shape);

Shape contiguous_strides(const Shape& shape);

template <class Byte>
class BasicTensorView {
  static_assert(std::is_same_v<std::remove_const_t<Byte>, std::byte>);

 public:
  BasicTensorView() = default;
  BasicTensorView(Byte* data, DType dtype, Shape shape)
      : data_(data), dtype_(dtype), shape_(shape), strides_(contiguous_strides(shape)) {}
  BasicTensorView(Byte* data, DType dtype, Shape shape, Shape strides)
      : data_(data), dtype_(dtype), shape_(shape), strides_(strides) {
    NUQ_CHECK(strides.rank() == shape.rank(), Errc::invalid_argument,
              "tensor view: {} strides for a shape of rank {}", strides.rank(), shape.rank());
  }
  // A read-only view can be made from a writable one, not the other way round.
  template <class Other, class = std::enable_if_t<std::is_const_v<Byte> && !std::is_const_v<Other>>>
  BasicTensorView(const BasicTensorView<Other>& other)
      : data_(other.data()), dtype_(other.dtype()), shape_(other.shape()), strides_(other.strides()) {}

  Byte* data() const noexcept { return data_; }
  template <class T>
  auto data_as() const noexcept {
    using Ptr = std::conditional_t<std::is_const_v<Byte>, const T*, T*>;
    return reinterpret_cast<Ptr>(data_);
  }
  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  const Shape& strides() const noexcept { return strides_; }
  int rank() const noexcept { return shape_.rank(); }
  int64_t dim(int i) const noexcept { return shape_[i]; }
  int64_t numel() const { return shape_.numel(); }
  // Bytes covered when contiguous.
  std::size_t nbytes() const { return std::size_t(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const noexcept {
    // An empty tensor touches no memory, so any strides describe it densely.
    if (shape_.numel() == 0) return true;
    int64_t expected = 1;
    for (int i = shape_.rank() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expected) return false;
      expected *= shape_[i];
    }
    return true;
  }

 private:
  Byte* data_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_;
  Shape strides_;
};

using TensorView = BasicTensorView<std::byte>;
using ConstTensorView = BasicTensorView<const std::byte>;

// Owning, 64-byte aligned, contiguous storage for one tensor.
class Buffer {
 public:
  static constexpr std::size_t kAlignment = 64;

  Buffer() = default;
  Buffer(DType dtype, Shape shape);  // zero-initialized

  std::byte* data() noexcept { return data_.get(); }
  const std::byte* data() const noexcept { return data_.get(); }
  template <class T>
  T* data_as() noexcept {
    return reinterpret_cast<T*>(data_.get());
  }
  template <class T>
  const T* data_as() const noexcept {
    return reinterpret_cast<const T*>(data_.get());
  }
  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  std::size_t nbytes() const noexcept { return nbytes_; }
  TensorView view() noexcept { return {data(), dtype_, shape_}; }
  ConstTensorView view() const noexcept { return {data(), dtype_, shape_}; }

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const noexcept;
  };
  std::unique_ptr<std::byte[], AlignedDelete> data_;
  DType dtype_ = DType::F32;
  Shape shape_;
  std::size_t nbytes_ = 0;
};

// Converts a contiguous F32/F16/BF16 tensor into a new F32 buffer (used by readers and the CLI).
Buffer to_float32(ConstTensorView src);

}  // namespace nuq
