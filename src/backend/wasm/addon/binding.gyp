{
  "targets": [
    {
      "target_name": "matmul",
      "sources": ["matmul.cc"],
      "cflags_cc": ["-O3", "-std=c++17", "-fno-exceptions"],
      "cflags_cc!": ["-fno-rtti"]
    }
  ]
}
