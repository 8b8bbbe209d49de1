"""Training step: the buffers that live only for part of it (`transients`) and the
timeline of memory through its phases, start -> forward -> loss -> backward -> optimizer step
(`timeline`), whose highest point is the peak; then what the GPU shows: the timeline replayed
through the caching allocator (`replay`, `allocator`) and the memory outside it (`device`)."""
