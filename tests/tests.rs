//! Integration tests: they run the real `provline` binary in temporary folders
//! and judge what it wrote with verifiers written elsewhere (OpenSSL, pkilint,
//! Python `cryptography`, mosquitto). `util` holds the shared setup.

mod util;

mod it {
    mod bad_inputs;
    mod bench;
    mod ca;
    mod cloud;
    mod cloud_load;
    mod cloud_register;
    mod faults;
    mod jitp;
    mod kill;
    mod line;
    mod profile;
    mod resume;
    mod tls;
    mod verifiers;
}
