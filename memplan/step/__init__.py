"""Training step: the buffers that live only for part of it (`transients`) and the
timeline of memory through its phases, start -> forward -> loss -> backward -> optimizer step
(`timeline`), whose highest point is the peak."""
