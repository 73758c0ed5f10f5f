pub use llama_cpp_sys_2::*;
