// any_tensor(pred, args...): does `pred` hold for any tensor among the arguments (tensors,
// optional tensors, tensor lists)? One helper for the ops' "any argument requires grad / has
// a tangent" questions (autograd.cpp, step.cpp), whatever their argument lists.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dtl {

namespace any_tensor_detail {
template <class Pred>
bool holds(const Pred& pred, const at::Tensor& t) {
  return pred(t);
}
template <class Pred>
bool holds(const Pred& pred, const std::optional<at::Tensor>& t) {
  return t.has_value() && pred(*t);
}
template <class Pred>
bool holds(const Pred& pred, at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (pred(t)) return true;
  return false;
}
}  // namespace any_tensor_detail

template <class Pred, class... Args>
bool any_tensor(const Pred& pred, const Args&... args) {
  return (any_tensor_detail::holds(pred, args) || ...);
}

}  // namespace dtl
