"""The compiler face: ``build``, partitioning and lowering flow, compile reports, the
ONNX and PyTorch frontends, the ``tvm_cim.run`` runtime function and the registration of
the ``cim`` target with TVM. Only ``hook`` is imported eagerly; it does not import TVM."""
