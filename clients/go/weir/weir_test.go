package weir_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"weir.dev/clients/go/weir"
	weirv1 "weir.dev/clients/go/weir/v1"
)

// The README tour against a live gateway: tests/interop/test_go_client.py runs this with a
// fresh tenant and a function whose handler returns its payload (examples.demo:echo).
func TestTour(t *testing.T) {
	address, apiKey, function := env(t, "WEIR_ADDRESS"), env(t, "WEIR_API_KEY"), env(t, "WEIR_FUNCTION")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The suite's gateway listens in plaintext on loopback.
	conn, err := weir.Dial(address, apiKey, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tasks := weirv1.NewTaskServiceClient(conn)

	payload := []byte("hello from Go")
	task, err := tasks.CreateTask(ctx, &weirv1.CreateTaskRequest{
		Task: &weirv1.Task{Function: function, Payload: payload},
	})
	if err != nil {
		t.Fatalf("CreateTask: %v", err)
	}
	if task.GetTaskId() == "" || task.GetState() != weirv1.TaskState_TASK_STATE_QUEUED {
		t.Fatalf("CreateTask returned %v, want a queued task with an ID", task)
	}

	// WatchTask streams each state change until a final one, then ends.
	watch, err := tasks.WatchTask(ctx, &weirv1.WatchTaskRequest{TaskId: task.GetTaskId()})
	if err != nil {
		t.Fatalf("WatchTask: %v", err)
	}
	var last *weirv1.WatchTaskResponse
	for {
		change, err := watch.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("WatchTask stream: %v", err)
		}
		if change.GetTask().GetTaskId() != task.GetTaskId() {
			t.Fatalf("a WatchTask message carries task %q, want %q", change.GetTask().GetTaskId(), task.GetTaskId())
		}
		t.Logf("%-9s %s", change.GetStage().GetService(), change.GetStage().GetState())
		last = change
	}
	if last.GetStage().GetState() != weirv1.TaskState_TASK_STATE_SUCCEEDED || !bytes.Equal(last.GetTask().GetResult(), payload) {
		t.Fatalf("the watch ended with %v, want TASK_STATE_SUCCEEDED and the task's result %q", last, payload)
	}

	// GetTask (FULL view by default): the handler's result, attempts and timeline.
	done, err := tasks.GetTask(ctx, &weirv1.GetTaskRequest{TaskId: task.GetTaskId()})
	if err != nil {
		t.Fatalf("GetTask: %v", err)
	}
	if done.GetState() != weirv1.TaskState_TASK_STATE_SUCCEEDED || !bytes.Equal(done.GetResult(), payload) {
		t.Fatalf("GetTask: state %v, result %q; want SUCCEEDED with result %q", done.GetState(), done.GetResult(), payload)
	}
	if stages := done.GetStages(); len(done.GetAttempts()) != 1 || len(stages) == 0 ||
		stages[0].GetState() != weirv1.TaskState_TASK_STATE_ACCEPTED {
		t.Fatalf("GetTask: %d attempts, stages %v; want one attempt and a timeline from ACCEPTED", len(done.GetAttempts()), stages)
	}

	// A bad request is INVALID_ARGUMENT with a BadRequest naming the field.
	_, err = tasks.CreateTask(ctx, &weirv1.CreateTaskRequest{
		Task: &weirv1.Task{TaskId: "not an id", Function: function},
	})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("CreateTask with a bad task_id: %v, want InvalidArgument", err)
	}
	violations := weir.FieldViolations(err)
	if len(violations) != 1 || violations[0].GetField() != "task.task_id" || violations[0].GetDescription() == "" {
		t.Fatalf("field violations %v, want one describing task.task_id", violations)
	}
	t.Logf("%s: %s", violations[0].GetField(), violations[0].GetDescription())
}

func env(t *testing.T, name string) string {
	t.Helper()
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set: this test needs a running gateway (WEIR_ADDRESS, WEIR_API_KEY, "+
			"WEIR_FUNCTION naming a function that returns its payload); "+
			"tests/interop/test_go_client.py runs it against the test suite", name)
	}
	return value
}
