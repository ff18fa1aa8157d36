"""ONNX path of the image tower: prompts are a graph input, so one graph serves every task of a prompt shape.

    catalogue  graph file names, variants, the JSON sidecar (GraphInfo) and finding the graph for a key
    attention  the export-friendly copy of the vision tower (nn.MultiheadAttention rewritten with SDPA)
    export     torch modules -> checked ONNX graphs and their sidecars (`mmserve export-onnx`)
    passes     the `opt` (fused onnxruntime contrib ops) and `int8` (dynamic quantisation) variants
    runtime    OnnxImageRuntime: onnxruntime behind the ImageRuntime protocol (MMSERVE_RUNTIME=onnx)

Nothing is imported here: `import onnx` inside these modules is the onnx package (absolute imports), and the
serving path imports only what it uses.
"""
