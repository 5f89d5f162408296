"""What leaves egp_fx: ONNX (onnx, with parity, opset, diagnose), torch.export programs
(saving), and the narrowings put back into the user's own model class (into_model)."""
