"""Answer quality per variant (HumanEval pass@1, a simple question set) through the mesh, with llama.cpp's
llama-server on the same GGUF as the anchor, and the cost per answer of the routing policy vs all-large."""
