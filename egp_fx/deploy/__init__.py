"""What leaves egp_fx: ONNX (onnx, with parity, opset, diagnose; the exporter measured fastest on
the target, latency; torch.export captures made traceable for TorchScript, traced_sizes),
torch.export programs (saving), one description of inputs and dynamic axes for both (inputs),
the form torch.onnx.export gives by default (default_form), the faster of compressed and
original (deliverable), and the narrowings put back into the user's own model class
(into_model)."""
