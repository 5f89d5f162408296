"""What a graph is made of, whatever form torch.fx or torch.export gives it.

ops          what a node is (the one classifier), reading the activation kinds (activations)
regions      the intervals of a pre-activation on which an activation is exactly affine
layer, norm  one view of a weighted layer and of a BatchNorm call, in both graph forms
attrs        graph attributes: read and bind tensors by path, who shares them, module paths
channels     the channel axis of a pre-activation; shapes: node shapes and running a graph
batches      what a loader yields, turned into the call of a model (a graph's inputs)
compare      the one error measure between outputs (a graph's outputs)
copying      copies that share tensors; pickling: GraphModules that survive torch.save

Nothing here imports from the floors above (capture, calibrate, passes, pipeline, ...).
"""
